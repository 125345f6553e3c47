//! The two request body shapes of lk-jwt-service, decoded with Go semantics
//! (see [`crate::gojson`]) and validated with the service's own messages.

use crate::gojson::{decode_struct, parse_first_value, set_int, set_string, DecodeError, Value};
use crate::lkjwt::MatrixError;

/// `openid_token`: the Matrix OpenID token the client got from its homeserver.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenIdToken {
    pub access_token: String,
    pub token_type: String,
    pub matrix_server_name: String,
    pub expires_in: i64,
}

const OPENID_FIELDS: &[&str] = &[
    "access_token",
    "token_type",
    "matrix_server_name",
    "expires_in",
];

impl OpenIdToken {
    /// Decodes into `self`, so a repeated `openid_token` object merges into
    /// the fields set by the earlier one, as Go does.
    fn decode_into(&mut self, value: &Value) -> Result<(), DecodeError> {
        decode_struct(value, "openid_token", OPENID_FIELDS, |idx, v| match idx {
            0 => set_string(v, "access_token", &mut self.access_token),
            1 => set_string(v, "token_type", &mut self.token_type),
            2 => set_string(v, "matrix_server_name", &mut self.matrix_server_name),
            _ => set_int(v, "expires_in", &mut self.expires_in),
        })
    }
}

/// `member` of the MatrixRTC (new) shape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub claimed_user_id: String,
    pub claimed_device_id: String,
}

const MEMBER_FIELDS: &[&str] = &["id", "claimed_user_id", "claimed_device_id"];

impl Member {
    fn decode_into(&mut self, value: &Value) -> Result<(), DecodeError> {
        decode_struct(value, "member", MEMBER_FIELDS, |idx, v| match idx {
            0 => set_string(v, "id", &mut self.id),
            1 => set_string(v, "claimed_user_id", &mut self.claimed_user_id),
            _ => set_string(v, "claimed_device_id", &mut self.claimed_device_id),
        })
    }
}

/// Optional delayed-leave delegation parameters, accepted by both shapes.
/// The stand-in validates them like the service but schedules nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DelayParams {
    pub delay_id: String,
    pub delay_timeout: i64,
    pub delay_cs_api_url: String,
}

impl DelayParams {
    fn validate(&self) -> Result<(), MatrixError> {
        let all = !self.delay_id.is_empty()
            && self.delay_timeout > 0
            && !self.delay_cs_api_url.is_empty();
        let any = !self.delay_id.is_empty()
            || self.delay_timeout > 0
            || !self.delay_cs_api_url.is_empty();
        if any && !all {
            return Err(MatrixError::bad_json(
                "The request body is missing `delay_id`, `delay_timeout` or `delay_cs_api_url`",
            ));
        }
        Ok(())
    }
}

/// Legacy (`/sfu/get`) shape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LegacyRequest {
    pub room: String,
    pub openid_token: OpenIdToken,
    pub device_id: String,
    pub delay: DelayParams,
}

const LEGACY_FIELDS: &[&str] = &[
    "room",
    "openid_token",
    "device_id",
    "delay_id",
    "delay_timeout",
    "delay_cs_api_url",
];

impl LegacyRequest {
    pub fn decode(value: &Value) -> Result<Self, DecodeError> {
        let mut req = LegacyRequest::default();
        decode_struct(
            value,
            "LegacySFURequest",
            LEGACY_FIELDS,
            |idx, v| match idx {
                0 => set_string(v, "room", &mut req.room),
                1 => req.openid_token.decode_into(v),
                2 => set_string(v, "device_id", &mut req.device_id),
                3 => set_string(v, "delay_id", &mut req.delay.delay_id),
                4 => set_int(v, "delay_timeout", &mut req.delay.delay_timeout),
                _ => set_string(v, "delay_cs_api_url", &mut req.delay.delay_cs_api_url),
            },
        )?;
        Ok(req)
    }

    /// The service does not require `device_id` (an empty one yields the
    /// identity `@user:server:`).
    pub fn validate(&self) -> Result<(), MatrixError> {
        if self.room.is_empty() {
            return Err(MatrixError::bad_json("Missing room parameter"));
        }
        if self.openid_token.access_token.is_empty()
            || self.openid_token.matrix_server_name.is_empty()
        {
            return Err(MatrixError::bad_json("Missing OpenID token parameters"));
        }
        self.delay.validate()
    }
}

/// MatrixRTC (`/get_token`) shape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenRequest {
    pub room_id: String,
    pub slot_id: String,
    pub openid_token: OpenIdToken,
    pub member: Member,
    pub delay: DelayParams,
}

const TOKEN_FIELDS: &[&str] = &[
    "room_id",
    "slot_id",
    "openid_token",
    "member",
    "delay_id",
    "delay_timeout",
    "delay_cs_api_url",
];

impl TokenRequest {
    pub fn decode(value: &Value) -> Result<Self, DecodeError> {
        let mut req = TokenRequest::default();
        decode_struct(value, "SFURequest", TOKEN_FIELDS, |idx, v| match idx {
            0 => set_string(v, "room_id", &mut req.room_id),
            1 => set_string(v, "slot_id", &mut req.slot_id),
            2 => req.openid_token.decode_into(v),
            3 => req.member.decode_into(v),
            4 => set_string(v, "delay_id", &mut req.delay.delay_id),
            5 => set_int(v, "delay_timeout", &mut req.delay.delay_timeout),
            _ => set_string(v, "delay_cs_api_url", &mut req.delay.delay_cs_api_url),
        })?;
        Ok(req)
    }

    pub fn validate(&self) -> Result<(), MatrixError> {
        if self.room_id.is_empty() || self.slot_id.is_empty() {
            return Err(MatrixError::bad_json(
                "The request body is missing `room_id` or `slot_id`",
            ));
        }
        let m = &self.member;
        if m.id.is_empty() || m.claimed_user_id.is_empty() || m.claimed_device_id.is_empty() {
            return Err(MatrixError::bad_json(
                "The request body `member` is missing a `id`, `claimed_user_id` or `claimed_device_id`",
            ));
        }
        if self.openid_token.access_token.is_empty()
            || self.openid_token.matrix_server_name.is_empty()
        {
            return Err(MatrixError::bad_json(
                "The request body `openid_token` is missing a `access_token` or `matrix_server_name`",
            ));
        }
        self.delay.validate()
    }
}

/// Either shape, as accepted by `/sfu/get` from v0.4.0 up to v0.5.0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyRequest {
    Legacy(LegacyRequest),
    Token(TokenRequest),
}

/// Decodes one shape: any decode failure is `400 M_NOT_JSON`.
pub fn decode_with<T>(
    body: &[u8],
    decode: fn(&Value) -> Result<T, DecodeError>,
) -> Result<T, MatrixError> {
    parse_first_value(body)
        .and_then(|v| decode(&v))
        .map_err(|_| MatrixError::not_json())
}

/// The v0.4.0..v0.5.0 `/sfu/get` logic: try the legacy shape, then the new
/// one; the first that decodes is validated and used. If neither decodes the
/// answer is `400 M_BAD_JSON` (not `M_NOT_JSON`), as in that code.
pub fn decode_either(body: &[u8]) -> Result<AnyRequest, MatrixError> {
    let malformed = || {
        MatrixError::bad_json(
            "The request body was malformed, missing required fields, or contained invalid values.",
        )
    };
    let value = parse_first_value(body).map_err(|_| malformed())?;
    if let Ok(req) = LegacyRequest::decode(&value) {
        req.validate()?;
        return Ok(AnyRequest::Legacy(req));
    }
    if let Ok(req) = TokenRequest::decode(&value) {
        req.validate()?;
        return Ok(AnyRequest::Token(req));
    }
    Err(malformed())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy(body: &str) -> Result<LegacyRequest, DecodeError> {
        LegacyRequest::decode(&parse_first_value(body.as_bytes())?)
    }

    fn token(body: &str) -> Result<TokenRequest, DecodeError> {
        TokenRequest::decode(&parse_first_value(body.as_bytes())?)
    }

    #[test]
    fn decodes_legacy_shape() {
        let req = legacy(
            r#"{"room":"!r:s","openid_token":{"access_token":"t","token_type":"Bearer","matrix_server_name":"s","expires_in":3600},"device_id":"D"}"#,
        )
        .unwrap();
        assert_eq!(req.room, "!r:s");
        assert_eq!(req.openid_token.access_token, "t");
        assert_eq!(req.openid_token.expires_in, 3600);
        assert_eq!(req.device_id, "D");
        assert!(req.validate().is_ok());
    }

    #[test]
    fn keys_match_case_insensitively_and_last_wins() {
        let req = legacy(r#"{"ROOM":"a","Room":"b","room":"c","rOoM":"d"}"#).unwrap();
        assert_eq!(req.room, "d");
        let req = legacy(r#"{"room":"a","ROOM":"b"}"#).unwrap();
        assert_eq!(req.room, "b");
        let req = legacy(r#"{"\u0072oom":"esc","Device_Id":"X"}"#).unwrap();
        assert_eq!(req.room, "esc");
        assert_eq!(req.device_id, "X");
        let req = token(r#"{"member":{"ID":"m","Claimed_User_Id":"@u:s"}}"#).unwrap();
        assert_eq!(req.member.id, "m");
        assert_eq!(req.member.claimed_user_id, "@u:s");
    }

    #[test]
    fn null_leaves_fields_and_objects_merge() {
        let req = legacy(r#"{"room":"a","room":null,"device_id":null}"#).unwrap();
        assert_eq!(req.room, "a");
        assert_eq!(req.device_id, "");
        let req = legacy(
            r#"{"openid_token":{"access_token":"t"},"openid_token":{"matrix_server_name":"s"},"openid_token":null}"#,
        )
        .unwrap();
        assert_eq!(req.openid_token.access_token, "t");
        assert_eq!(req.openid_token.matrix_server_name, "s");
        assert_eq!(legacy("null").unwrap(), LegacyRequest::default());
    }

    #[test]
    fn rejects_unknown_fields_and_wrong_types() {
        assert!(
            matches!(legacy(r#"{"room":"a","extra":1}"#), Err(DecodeError::UnknownField(k)) if k == "extra")
        );
        assert!(legacy(r#"{"openid_token":{"access_token":"t","scope":"x"}}"#).is_err());
        assert!(legacy(r#"{"room":1}"#).is_err());
        assert!(legacy(r#"{"room":["a"]}"#).is_err());
        assert!(legacy(r#"{"openid_token":"t"}"#).is_err());
        assert!(legacy(r#"{"openid_token":{"expires_in":"3600"}}"#).is_err());
        assert!(legacy(r#"{"openid_token":{"expires_in":3600.5}}"#).is_err());
        assert!(legacy(r#"{"room_id":"a"}"#).is_err());
        assert!(legacy(r#"["room"]"#).is_err());
        assert!(legacy(r#""room""#).is_err());
        assert!(token(r#"{"room":"a"}"#).is_err());
    }

    #[test]
    fn validation_messages() {
        let err = legacy(r#"{"openid_token":{"access_token":"t","matrix_server_name":"s"}}"#)
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(
            (err.status, err.errcode, err.error.as_str()),
            (400, "M_BAD_JSON", "Missing room parameter")
        );
        let err = legacy(r#"{"room":"r","openid_token":{"access_token":"t"}}"#)
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(err.error, "Missing OpenID token parameters");
        let err = legacy(r#"{"room":"r","openid_token":{"access_token":"t","matrix_server_name":"s"},"delay_id":"d"}"#)
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(err.errcode, "M_BAD_JSON");
        let ok = legacy(
            r#"{"room":"r","openid_token":{"access_token":"t","matrix_server_name":"s"},"delay_id":"d","delay_timeout":5000,"delay_cs_api_url":"https://hs"}"#,
        )
        .unwrap();
        assert!(ok.validate().is_ok());

        let err = token(r#"{"room_id":"r"}"#).unwrap().validate().unwrap_err();
        assert_eq!(
            err.error,
            "The request body is missing `room_id` or `slot_id`"
        );
        let err =
            token(r#"{"room_id":"r","slot_id":"s","member":{"id":"m","claimed_user_id":"u"}}"#)
                .unwrap()
                .validate()
                .unwrap_err();
        assert!(err.error.contains("`member`"));
        let err = token(
            r#"{"room_id":"r","slot_id":"s","member":{"id":"m","claimed_user_id":"u","claimed_device_id":"d"},"openid_token":{"access_token":"t"}}"#,
        )
        .unwrap()
        .validate()
        .unwrap_err();
        assert!(err.error.contains("`openid_token`"));
    }

    #[test]
    fn either_shape_on_legacy_endpoint() {
        let legacy_body = br#"{"room":"r","openid_token":{"access_token":"t","matrix_server_name":"s"},"device_id":"D"}"#;
        assert!(matches!(
            decode_either(legacy_body),
            Ok(AnyRequest::Legacy(_))
        ));
        let new_body = br#"{"room_id":"r","slot_id":"m.call#ROOM","openid_token":{"access_token":"t","matrix_server_name":"s"},"member":{"id":"m","claimed_user_id":"@u:s","claimed_device_id":"D"}}"#;
        assert!(matches!(decode_either(new_body), Ok(AnyRequest::Token(_))));
        let err = decode_either(b"not json").unwrap_err();
        assert_eq!((err.status, err.errcode), (400, "M_BAD_JSON"));
        let err = decode_either(br#"{"room":"r","room_id":"x"}"#).unwrap_err();
        assert_eq!(err.errcode, "M_BAD_JSON");
        // `{}` decodes as the legacy shape and fails its validation.
        assert_eq!(
            decode_either(b"{}").unwrap_err().error,
            "Missing room parameter"
        );
        let err = decode_with(b"{", LegacyRequest::decode).unwrap_err();
        assert_eq!(
            (err.status, err.errcode, err.error.as_str()),
            (400, "M_NOT_JSON", "Error reading request")
        );
    }
}
